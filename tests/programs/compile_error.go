// Does not compile, on purpose: a string where a number is required.
package main

import "fmt"

func main() {
	var answer int = "forty-two"
	fmt.Println(answer)
}
